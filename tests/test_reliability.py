"""Nothing saved is ever lost (issue 16): config-mismatched resumes, concurrent runs, failed starts,
signals, full disks, incomplete evaluations, silent batch copies, bad examples, unclear errors.

Items 1-5 also check that every checkpoint file and config.json that existed before is unchanged
afterwards (sha256 of the workdir's checkpoints/ tree and config.json). Multi-host SIGTERM (item 9)
is in tests/test_multihost.py.
"""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint._src.path.atomicity as atomicity
import pytest
from PIL import Image

from ec_dit import checkpoint, data as ip, schema, sharding
from ec_dit.data import preprocess
from ec_dit.geneval import prompts
from ec_dit.geneval.cli import main as geneval_main
from ec_dit.training import loop, preemption as preemption_lib, step as step_lib, workdir as workdir_lib
from helpers import REPO, read_losses, train_config

RUNNER = pathlib.Path(__file__).with_name("train_runner.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))


def hashes(workdir) -> dict[str, str]:
  """sha256 of every file under checkpoints/ (complete saves only) and of config.json."""
  workdir = pathlib.Path(workdir)
  files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file() and ".orbax-checkpoint-tmp" not in str(p)]
  files += [workdir / "config.json"] if (workdir / "config.json").exists() else []
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def unchanged(before: dict, after: dict) -> bool:
  """Every file of `before` is in `after` with the same contents."""
  return all(after.get(k) == v for k, v in before.items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step run (checkpoint at step 2) to copy: its config is `train_config(num_train_steps=2)`."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop.train(train_config(num_train_steps=2), str(workdir))
  return workdir


def copy_run(trained, tmp_path):
  dest = tmp_path / "run"
  shutil.copytree(trained, dest)
  return dest


# -- 1. A resume with a state-changing config stops; safe changes proceed -------------------------

def test_state_changing_config_stops_before_anything_is_written(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  before, metrics = hashes(run), (run / "metrics.jsonl").read_bytes()
  config = train_config(num_train_steps=4, model__ffn__num_experts=2, optimizer="adamw")
  with pytest.raises(workdir_lib.WorkdirError) as e:
    loop.train(config, str(run))
  msg = str(e.value)
  assert "config.model.ffn.num_experts: 4 -> 2" in msg and "config.optimizer: 'muon' -> 'adamw'" in msg
  assert "new --workdir" in msg and "num_train_steps" not in msg  # the safe change is not listed as a problem
  assert hashes(run) == before and (run / "metrics.jsonl").read_bytes() == metrics
  assert not (run / "run.lock").exists()


def test_safe_config_changes_are_named_in_one_line(trained, tmp_path, capsys):
  run = copy_run(trained, tmp_path)
  workdir_lib.check_config(str(run), train_config(num_train_steps=4, learning_rate=5e-4, mesh__data=2,
                                                  input__read_threads=1))
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("resuming with changed settings:")
  assert "num_train_steps 2 -> 4" in out[0] and "learning_rate 0.001 -> 0.0005" in out[0]
  assert "mesh.data -1 -> 2" in out[0] and "input.read_threads 0 -> 1" in out[0]


def test_checkpoints_that_do_not_restore_stop_the_run_with_reasons(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  (run / "config.json").unlink()  # nothing to compare with: the restore itself must refuse
  before, metrics = hashes(run), (run / "metrics.jsonl").read_bytes()
  with pytest.raises(checkpoint.RestoreError, match=r"(?s)none of the 1 checkpoints.*step 2: .*experts.*"
                                                    r"saved \(4, .*this config \(2, .*new --workdir"):
    loop.train(train_config(num_train_steps=4, model__ffn__num_experts=2), str(run))
  assert hashes(run) == before and (run / "metrics.jsonl").read_bytes() == metrics
  assert not (run / "config.json").exists()


def test_every_schema_key_is_classified_for_resume():
  for key in schema.flatten(schema.base_config().to_dict()):
    assert schema.is_state_field(key) != schema.is_safe_field(key), key


def test_how_dropless_matmuls_run_may_change_on_resume_but_the_experts_may_not():
  state, safe = schema.split_differences([("model.ffn.dropless_impl", "auto", "tiles"),
                                          ("model.ffn.num_experts", 8, 4)])
  assert [d[0] for d in safe] == ["model.ffn.dropless_impl"]
  assert [d[0] for d in state] == ["model.ffn.num_experts"]


# -- 2. One run per workdir ---------------------------------------------------------------------

def test_a_second_run_fails_at_once_naming_the_holder(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    info = {"host": socket.gethostname(), "pid": holder.pid, "started": "2025-01-01 00:00:00 UTC"}
    (run / "run.lock").write_text(json.dumps(info))
    before = hashes(run)
    t0 = time.time()
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another run \(host '{socket.gethostname()}', "
                                                       rf"pid {holder.pid}, started 2025-01-01"):
      loop.train(train_config(num_train_steps=4), str(run))
    assert time.time() - t0 < 10  # at once: before any compilation
    assert hashes(run) == before and json.loads((run / "run.lock").read_text()) == info
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
  lock = workdir_lib.Lock(str(tmp_path))
  assert "taking over the stale lock" in capsys.readouterr().out
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):  # held now, also within one process
    workdir_lib.Lock(str(tmp_path))
  lock.release()
  assert not (tmp_path / "run.lock").exists()
  # a lock from another host cannot be checked: it is never taken over
  (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
  with pytest.raises(workdir_lib.WorkdirError, match="host 'elsewhere'"):
    workdir_lib.Lock(str(tmp_path))


# -- 3. A start that fails after validation writes nothing; config.json is written atomically --------

def test_a_start_failing_after_validation_leaves_config_and_checkpoints(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  before, metrics = hashes(run), (run / "metrics.jsonl").read_bytes()
  # mesh.* is safe to change, so this passes the config check and fails later, when the mesh is built
  with pytest.raises(ValueError, match=r"config\.batch_size: must be a multiple of 8"):
    loop.train(train_config(num_train_steps=4, mesh__data=8), str(run))
  empty = tmp_path / "empty"
  empty.mkdir()
  (tmp_path / "fresh").mkdir()
  with pytest.raises(ValueError, match="config.input.source"):  # a bad input folder: no run started
    loop.train(train_config(num_train_steps=4, input__source=f"folder:{empty}"), str(tmp_path / "fresh"))
  assert hashes(run) == before and (run / "metrics.jsonl").read_bytes() == metrics
  assert os.listdir(tmp_path / "fresh") == []


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
  workdir_lib.write_config(str(tmp_path), train_config())
  before = (tmp_path / "config.json").read_bytes()

  def full_disk(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(json, "dump", full_disk)
  with pytest.raises(OSError):
    workdir_lib.write_config(str(tmp_path), train_config(num_train_steps=9))
  assert (tmp_path / "config.json").read_bytes() == before
  assert os.listdir(tmp_path) == ["config.json"]


# -- 4. Signals: one complete save, exit 0; a second SIGINT exits at once --------------------------

def _start(workdir, log, **overrides):
  return subprocess.Popen([sys.executable, str(RUNNER), str(workdir), json.dumps(overrides), "train"],
                          cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait(proc, log, condition, what, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended before {what}: {pathlib.Path(log).read_text()[-3000:]}")
    if condition():
      return
    time.sleep(0.1)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def _logged(run):
  return max(read_losses(run)) if (run / "metrics.jsonl").exists() and read_losses(run) else 0


def test_signals_save_once_and_exit_0_and_a_second_sigint_exits_at_once(tmp_path, capsys):
  run, log = tmp_path / "run", tmp_path / "log.txt"
  kw = dict(num_train_steps=10_000, checkpoint_every_steps=2, keep_checkpoints=1000)
  # SIGINT while the first step compiles: no segfault, a save of step 1, exit 0
  proc = _start(run, log, **kw)
  _wait(proc, log, lambda: "train:" in log.read_text(), "the progress bar")
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
  assert "SIGINT" in log.read_text() and checkpoint.saved_steps(run) == [1]
  # SIGTERM, then more SIGTERMs during the save: one complete save, exit 0
  before = hashes(run)
  proc = _start(run, log, **kw)
  _wait(proc, log, lambda: _logged(run) >= 3, "step 3")
  for _ in range(6):
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
  assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
  last = _logged(run)
  assert checkpoint.saved_steps(run)[-1] == last and unchanged(before, hashes(run))
  assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
  # SIGINT twice: the process ends at once (or, if the save was already done, exits 0); earlier saves intact
  before = hashes(run)
  log2 = tmp_path / "log2.txt"
  proc = _start(run, log2, **kw)
  _wait(proc, log2, lambda: _logged(run) >= last + 2, f"step {last + 2}")
  proc.send_signal(signal.SIGINT)
  while proc.poll() is None and "SIGINT: saving" not in log2.read_text():
    time.sleep(0.01)
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
  rc = proc.wait(timeout=60)
  assert rc in (-signal.SIGINT, 0), log2.read_text()[-3000:]
  assert unchanged(before, hashes(run)) and "Traceback" not in log2.read_text()
  # and the next start resumes from the newest complete checkpoint (taking over the killed run's lock)
  newest = checkpoint.saved_steps(run)[-1]
  capsys.readouterr()
  loop.train(train_config(**dict(kw, num_train_steps=newest + 1)), str(run))
  err = capsys.readouterr().err
  assert f"resumed from step {newest}" in err and ("taking over the stale lock" in err or rc == 0)
  assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == newest + 1


def test_preemption_ignores_repeated_sigterm_and_a_second_sigint_ends_the_process():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption_lib.Preemption() as p:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: still alive
    assert p.requested and p.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next Ctrl-C ends the process at once
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # exiting after a save: SIGTERM stays ignored
  signal.signal(signal.SIGTERM, previous)
  script = ("import os, signal, time\nfrom ec_dit.training.preemption import Preemption\n"
            "with Preemption() as p:\n  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(0.2)\n"
            "  assert p.requested\n  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(5)\nprint('survived')\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
  assert out.returncode == -signal.SIGINT and "survived" not in out.stdout, out.stderr


# -- 5. Disk full: one message, non-zero exit, earlier checkpoints intact, temp folders cleaned -----

def test_a_full_disk_stops_with_one_message_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys):
  run = tmp_path / "run"
  config = train_config(num_train_steps=6, keep_checkpoints=5)
  original, seen = atomicity.on_commit_callback, {}

  async def full_disk(tmpdir, *args, **kwargs):  # runs in Orbax's background save thread
    if "/4.orbax-checkpoint-tmp" in str(tmpdir.get()):
      seen.update(hashes(run))  # what existed when the disk filled up
      raise OSError(errno.ENOSPC, "No space left on device", str(tmpdir.get()))
    return await original(tmpdir, *args, **kwargs)

  monkeypatch.setattr(atomicity, "on_commit_callback", full_disk)
  with pytest.raises(checkpoint.SaveError) as e:
    loop.train(config, str(run))
  msg = str(e.value)
  assert msg.startswith(f"saving the checkpoint of step 4 to {run / 'checkpoints'} failed: no space left on device")
  assert "the last good checkpoint is step 2" in msg and "\n" not in msg
  assert checkpoint.saved_steps(run) == [2] and unchanged(seen, hashes(run)) and "checkpoints/2/_CHECKPOINT_METADATA" in seen
  assert [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]  # the partial save is still there
  assert "Traceback" not in capsys.readouterr().err
  monkeypatch.setattr(atomicity, "on_commit_callback", original)
  loop.train(config, str(run))  # the next start cleans up and resumes from step 2
  err = capsys.readouterr().err
  assert "removed 1 incomplete checkpoint folder" in err and "resumed from step 2" in err
  assert checkpoint.saved_steps(run) == [2, 4, 6] and unchanged(seen, hashes(run))


# -- 6. GenEval on an incomplete folder ---------------------------------------------------------

def test_evaluate_refuses_an_incomplete_folder_unless_allowed(tmp_path, capsys):
  pf, img, res = str(tmp_path / "p.jsonl"), tmp_path / "img", str(tmp_path / "r.jsonl")
  prompts.write_prompts(prompts.generate_suite(prompts.DOMAINS["shapes"], 0, 1)[:6], pf)
  assert geneval_main(["render", "--prompts", pf, "--out", str(img), "--n", "4", "--quiet"]) == 0
  shutil.rmtree(img / "00002" / "samples")  # a prompt without samples
  (img / "00004" / "samples" / "0003.png").unlink()
  capsys.readouterr()
  assert geneval_main(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 1
  out = capsys.readouterr().out
  assert "INCOMPLETE" in out and "00002/samples: missing 0000.png, 0001.png, 0002.png, 0003.png" in out
  assert "00004/samples: missing 0003.png" in out and "--allow-incomplete" in out and not os.path.exists(res)
  assert geneval_main(["evaluate", "--images", str(img), "--out", res, "--quiet", "--prompts", pf]) == 1
  assert geneval_main(["evaluate", "--images", str(img), "--out", res, "--quiet", "--allow-incomplete"]) == 0
  out = capsys.readouterr().out
  assert "coverage: 19/24 images (79.2%); 5 missing image(s) counted as incorrect" in out
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["images"] == pytest.approx(19 / 24) and summary["overall"] < 1.0


def test_summary_names_the_file_and_line_of_a_malformed_row(tmp_path, capsys):
  res = tmp_path / "r.jsonl"
  good = {"tag": "colors", "correct": True, "metadata": "{}", "prompt": "x"}
  res.write_text(json.dumps(good) + "\n" + json.dumps(good)[:40] + "\n")
  assert geneval_main(["summary", str(res)]) == 2
  assert f"{res}:2: not a JSON line" in capsys.readouterr().err


# -- 7. Checkpoints deleted, metrics kept: a fresh start moves the old logs aside -----------------

def test_a_fresh_start_moves_old_metrics_aside(trained, tmp_path, capsys):
  run = copy_run(trained, tmp_path)
  old = (run / "metrics.jsonl").read_text()
  shutil.rmtree(run / "checkpoints")
  loop.train(train_config(num_train_steps=2), str(run))
  err = capsys.readouterr().err
  assert "starting from scratch" in err and "metrics.jsonl" in err
  (aside,) = (run / "previous").iterdir()
  assert (aside / "metrics.jsonl").read_text() == old and (aside / "tensorboard").is_dir()
  assert sorted(read_losses(run)) == [1, 2] and len((run / "metrics.jsonl").read_text().splitlines()) == 2


# -- 8. A batch that cannot be split over the mesh's batch axes is an error ------------------------

def test_a_batch_that_would_be_copied_instead_of_split_is_an_error():
  config = train_config(batch_size=3, mesh__data=2)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:2])  # batch_size=3, mesh.data=2, 2 devices
  batch = sharding.batch_sharding(mesh, config.mesh.rules, config.batch_size)
  assert batch.spec == jax.sharding.PartitionSpec()  # what the sharding alone would do: copy it to both
  with pytest.raises(ValueError, match=r"config\.batch_size: must be a multiple of 2 to be split over the batch "
                                       r"axes \(mesh\.data=2\), got 3"):
    step_lib.check_batch_split(config, batch)
  config = train_config(batch_size=4, mesh__data=2)  # divisible: fine
  step_lib.check_batch_split(config, sharding.batch_sharding(mesh, config.mesh.rules, 4))


# -- Unclear errors ---------------------------------------------------------------------------------

def _image_folder(folder, n=6):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"a photo of {i} red circles")
  return folder


def _tokenize(caption):
  return np.zeros(4, np.int32), np.ones(4, np.bool_)


def test_bad_images_are_named_or_skipped_and_counted(tmp_path):
  folder = _image_folder(tmp_path / "imgs")
  (folder / "2.png").write_bytes(b"")  # zero bytes
  (folder / "4.png").write_bytes((folder / "4.png").read_bytes()[:30])  # truncated
  c = ip.input_defaults()
  c.source, c.image_size, c.shuffle, c.read_threads = f"folder:{folder}", 16, False, 0
  with pytest.raises(preprocess.BadExampleError, match=rf"cannot decode image {folder / '2.png'} .*"
                                                       r"skip_bad_examples=True"):
    list(ip.create_dataset(c, batch_size=6, tokenize=_tokenize, seed=0, num_epochs=1))
  c.skip_bad_examples = True
  (batch,) = list(ip.create_dataset(c, batch_size=6, tokenize=_tokenize, seed=0, num_epochs=1))
  assert batch["bad"].tolist() == [0, 0, 1, 0, 1, 0] and batch["image"].shape == (6, 16, 16, 3)


def test_skipped_examples_are_counted_in_metrics_and_reported(tmp_path, capsys):
  folder = _image_folder(tmp_path / "imgs", 8)
  (folder / "3.png").write_bytes(b"not a png")
  config = train_config(num_train_steps=2, input__source=f"folder:{folder}", input__shuffle=False,
                        input__skip_bad_examples=True)
  loop.train(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["input/bad_examples"] for r in rows] == [1, 1]
  err = capsys.readouterr().err
  assert f"skipping a bad example: config.input.source: cannot decode image {folder / '3.png'}" in err
  assert "skipped 1 bad example(s)" in err


def test_bad_example_without_skipping_stops_the_run_naming_the_file(tmp_path):
  folder = _image_folder(tmp_path / "imgs", 8)
  (folder / "0.png").write_bytes(b"")
  with pytest.raises(preprocess.BadExampleError, match=rf"cannot decode image {folder / '0.png'}"):
    loop.train(train_config(num_train_steps=2, input__source=f"folder:{folder}", input__shuffle=False),
               str(tmp_path / "run"))


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
  folder = _image_folder(tmp_path / "imgs")
  (folder / "1.txt").write_bytes("a caf\xe9".encode("latin-1"))
  c = ip.input_defaults()
  c.source, c.image_size, c.shuffle, c.read_threads = f"folder:{folder}", 16, False, 0
  with pytest.raises(ValueError, match=rf"caption file {folder / '1.txt'} is not UTF-8.*skip_bad_examples"):
    ip.create_dataset(c, batch_size=6, tokenize=_tokenize, seed=0)
  c.skip_bad_examples = True
  (batch,) = list(ip.create_dataset(c, batch_size=6, tokenize=_tokenize, seed=0, num_epochs=1))
  assert batch["bad"].tolist() == [0, 1, 0, 0, 0, 0]
  jsonl = tmp_path / "data.jsonl"
  jsonl.write_bytes(b'{"image": "imgs/0.png", "caption": "ok"}\n{"image": "imgs/1.png", "caption": "caf\xe9"}\n')
  c.source, c.skip_bad_examples = f"jsonl:{jsonl}", False
  with pytest.raises(ValueError, match=rf"{jsonl}:2: not UTF-8"):
    ip.create_dataset(c, batch_size=2, tokenize=_tokenize, seed=0)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=tests/micro_config.py", *args],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_unknown_key_and_missing_workdir_are_one_line_errors(tmp_path):
  out = _cli("--mode=summary", "--config.model.ffn.num_expert=4")
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "--config.model.ffn.num_expert: unknown config key; closest known: model.ffn.num_experts" in out.stderr
  out = _cli("--mode=summary", "--config.foo=1")
  assert out.returncode == 2 and out.stderr.strip().startswith("error: --config.foo: unknown config key; closest")
  out = _cli("--mode=evaluate", f"--workdir={tmp_path / 'nope'}")
  assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr, out.stderr
  assert not (tmp_path / "nope").exists()
