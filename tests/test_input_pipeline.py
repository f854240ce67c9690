"""Input pipeline: determinism, shapes, shuffling, process sharding, iterator
checkpoints (get/set state and Orbax), folder / JSONL / TFDS sources,
validation errors and global batch assembly."""
import hashlib
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ec_dit import data as ip
from ec_dit.data import shapes_world as sw

L = 12


def fake_tokenize(caption: str):
  """Bytes of the caption (mod 251, +1), padded to L (module level: picklable)."""
  b = np.frombuffer(caption.encode("utf-8"), np.uint8)[:L].astype(np.int32) % 251 + 1
  tokens, mask = np.zeros(L, np.int32), np.zeros(L, np.bool_)
  tokens[:len(b)], mask[:len(b)] = b, True
  return tokens, mask


def cfg(**kw):
  c = ip.input_defaults()
  c.num_examples = 64
  c.update(kw)
  return c


def take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert np.array_equal(x[k], y[k]), k


def image_ids(batch):
  return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in batch["image"]]


def test_defaults_validate():
  c = ip.input_defaults()
  ip.check_input_and_source(c)
  assert c.source == "shapes_world" and c.worker_count == 0 and c.shuffle


def test_deterministic_across_datasets():
  a = take(ip.create_dataset(cfg(), batch_size=8, tokenize=fake_tokenize, seed=3), 3)
  b = take(ip.create_dataset(cfg(), batch_size=8, tokenize=fake_tokenize, seed=3), 3)
  assert_batches_equal(a, b)
  c = take(ip.create_dataset(cfg(), batch_size=8, tokenize=fake_tokenize, seed=4), 1)
  assert image_ids(a[0]) != image_ids(c[0])


def test_batch_shapes_dtypes_range_and_values():
  (batch,) = take(ip.create_dataset(cfg(shuffle=False), batch_size=4, tokenize=fake_tokenize, seed=0), 1)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (4, L) and batch["tokens"].dtype == np.int32
  assert batch["mask"].shape == (4, L) and batch["mask"].dtype == np.bool_
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  src = sw.ShapesWorldSource(32, 64, seed=0)
  for i in range(4):  # unshuffled: example i, scaled to [-1, 1], caption tokenized
    np.testing.assert_allclose(batch["image"][i], src[i]["image"] / 127.5 - 1.0, atol=1e-6)
    tokens, mask = fake_tokenize(src[i]["caption"])
    assert np.array_equal(batch["tokens"][i], tokens) and np.array_equal(batch["mask"][i], mask)


def test_shuffle_changes_order_not_content():
  def epoch(**kw):
    ds = ip.create_dataset(cfg(num_examples=32, **kw), batch_size=8, tokenize=fake_tokenize, seed=1,
                           num_epochs=1)
    batches = list(ds)
    assert len(batches) == 4
    return [i for b in batches for i in image_ids(b)]

  plain, shuffled = epoch(shuffle=False), epoch(shuffle=True)
  assert len(set(plain)) == 32
  assert sorted(plain) == sorted(shuffled) and plain != shuffled
  # Training stream: each epoch is a new permutation of the same examples.
  it = iter(ip.create_dataset(cfg(num_examples=32), batch_size=8, tokenize=fake_tokenize, seed=1))
  e1 = [i for _ in range(4) for i in image_ids(next(it))]
  e2 = [i for _ in range(4) for i in image_ids(next(it))]
  assert e1 == shuffled and sorted(e2) == sorted(e1) and e2 != e1


def test_process_sharding_disjoint_and_matches_global():
  kw = dict(tokenize=fake_tokenize, seed=5, num_epochs=1)
  single = list(ip.create_dataset(cfg(num_examples=40), batch_size=8, **kw))
  p0 = list(ip.create_dataset(cfg(num_examples=40), batch_size=8, process_index=0, process_count=2, **kw))
  p1 = list(ip.create_dataset(cfg(num_examples=40), batch_size=8, process_index=1, process_count=2, **kw))
  # 40 examples = 5 global batches of 8; each process yields 5 local batches of 4.
  assert len(single) == 5 and len(p0) == len(p1) == 5
  ids0 = [i for b in p0 for i in image_ids(b)]
  ids1 = [i for b in p1 for i in image_ids(b)]
  assert all(b["image"].shape[0] == 4 for b in p0 + p1)
  assert not set(ids0) & set(ids1)
  assert sorted(ids0 + ids1) == sorted(i for b in single for i in image_ids(b))
  for g, a, b in zip(single, p0, p1):  # the global batch is the same whatever the process count
    for k in g:
      assert np.array_equal(g[k], np.concatenate([a[k], b[k]]))
  with pytest.raises(ValueError, match="divisible|multiple of process_count"):
    ip.create_dataset(cfg(), batch_size=6, tokenize=fake_tokenize, seed=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    ip.create_dataset(cfg(), batch_size=8, tokenize=fake_tokenize, seed=0, process_index=2, process_count=2)


def test_iterator_state_round_trip():
  ds = ip.create_dataset(cfg(), batch_size=4, tokenize=fake_tokenize, seed=2)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  json.dumps(state)  # serialisable, as the Orbax handler writes it
  expected = take(it, 3)
  it2 = iter(ip.create_dataset(cfg(), batch_size=4, tokenize=fake_tokenize, seed=2))
  it2.set_state(state)
  assert_batches_equal(take(it2, 3), expected)


def test_orbax_checkpoint_manager_async(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = ip.create_dataset(cfg(), batch_size=4, tokenize=fake_tokenize, seed=7)
  it = iter(ds)
  take(it, 2)
  tree = {"w": jax.numpy.arange(6, dtype=jax.numpy.float32).reshape(2, 3), "step": np.array(2, np.int32)}
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    assert mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                data_iter=ip.iterator_save_args(it)))
    expected = take(it, 3)  # advancing while the save is in flight must not change what was saved
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    assert mngr.latest_step() == 2
    fresh = iter(ip.create_dataset(cfg(), batch_size=4, tokenize=fake_tokenize, seed=7))
    restored = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree),
                                                       data_iter=ip.iterator_restore_args(fresh)))
  np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
  assert_batches_equal(take(restored["data_iter"], 3), expected)


# ----------------------------------------------------------------------------
# File sources

GREEN = np.array([30, 200, 60], np.uint8)


def write_images(folder):
  """Four tiny non-square images whose centre crop is uniform; returns {name: expected RGB}."""
  folder.mkdir(parents=True, exist_ok=True)
  a = np.zeros((20, 36, 3), np.uint8)  # wide RGB: red | green | blue bands; centre crop is green
  a[:, :8] = (255, 0, 0)
  a[:, 8:28] = GREEN
  a[:, 28:] = (0, 0, 255)
  Image.fromarray(a).save(folder / "a_rgb.png")
  b = np.zeros((30, 18, 4), np.uint8)  # tall RGBA, fully transparent: composited on white
  b[..., 0] = 255
  Image.fromarray(b, "RGBA").save(folder / "b_rgba.png")
  g = np.zeros((28, 16), np.uint8)  # tall grey: black | 64 | black; centre crop is 64
  g[6:22] = 64
  Image.fromarray(g, "L").save(folder / "c_gray.png")
  d = np.full((24, 24, 3), 200, np.uint8)  # square, already uniform
  Image.fromarray(d).save(folder / "d_square.jpg", quality=100)
  return {"a_rgb.png": GREEN, "b_rgba.png": np.full(3, 255), "c_gray.png": np.full(3, 64),
          "d_square.jpg": np.full(3, 200)}


def check_file_batches(batches, names, expected, captions, size):
  images = np.concatenate([b["image"] for b in batches])
  tokens = np.concatenate([b["tokens"] for b in batches])
  assert images.shape == (len(names), size, size, 3)
  for i, name in enumerate(names):
    want = expected[name] / 127.5 - 1.0
    np.testing.assert_allclose(images[i], np.broadcast_to(want, images[i].shape), atol=3 / 127.5, err_msg=name)
    assert np.array_equal(tokens[i], fake_tokenize(captions[name])[0])


def test_folder_source_txt_and_jsonl(tmp_path):
  folder = tmp_path / "imgs"
  expected = write_images(folder)
  names = sorted(expected)
  captions = {n: f"caption of {n}" for n in names}
  for n in names:
    (folder / n).with_suffix(".txt").write_text(captions[n] + "\n")
  c = cfg(source=f"folder:{folder}", image_size=8, shuffle=False)
  ip.check_input_and_source(c)
  batches = list(ip.create_dataset(c, batch_size=2, tokenize=fake_tokenize, seed=0, num_epochs=1))
  check_file_batches(batches, names, expected, captions, 8)
  # A metadata.jsonl (Hugging Face imagefolder style: file_name / text) takes precedence.
  order = names[::-1]
  other = {n: f"jsonl says {n}" for n in names}
  (folder / "metadata.jsonl").write_text(
      "".join(json.dumps({"file_name": n, "text": other[n]}) + "\n" for n in order))
  batches = list(ip.create_dataset(c, batch_size=4, tokenize=fake_tokenize, seed=0, num_epochs=1))
  check_file_batches(batches, order, expected, other, 8)


def test_jsonl_source(tmp_path):
  expected = write_images(tmp_path / "data" / "imgs")
  names = sorted(expected)
  captions = {n: f"a picture {i}" for i, n in enumerate(names)}
  lines = [{"image": f"imgs/{n}" if i % 2 else str(tmp_path / "data" / "imgs" / n), "caption": captions[n]}
           for i, n in enumerate(names)]
  path = tmp_path / "data" / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  c = cfg(source=f"jsonl:{path}", image_size=12, shuffle=False)
  batches = list(ip.create_dataset(c, batch_size=2, tokenize=fake_tokenize, seed=0, num_epochs=1))
  check_file_batches(batches, names, expected, captions, 12)
  # Shuffled, infinite: same content as the unshuffled epoch.
  it = iter(ip.create_dataset(cfg(source=f"jsonl:{path}", image_size=12), batch_size=2,
                              tokenize=fake_tokenize, seed=0))
  first = [t.tobytes() for _ in range(2) for t in next(it)["tokens"]]
  assert sorted(first) == sorted(fake_tokenize(captions[n])[0].tobytes() for n in names)
  path.write_text('{"image": "imgs/missing.png", "caption": "x"}\n')
  with pytest.raises(ValueError, match="config.input.source.*not found"):
    ip.create_dataset(c, batch_size=2, tokenize=fake_tokenize, seed=0)
  path.write_text('{"img": "imgs/a_rgb.png", "caption": "x"}\n')
  with pytest.raises(ValueError, match="config.input.source.*'image'"):
    ip.create_dataset(c, batch_size=2, tokenize=fake_tokenize, seed=0)


def test_tfds_source(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  import ec_dit.data.shapes_world_tfds as swt
  c = cfg(source="tfds:shapes_world/tiny:test", tfds_data_dir=str(tmp_path), shuffle=False)
  batches = list(ip.create_dataset(c, batch_size=4, tokenize=fake_tokenize, seed=0, num_epochs=1))
  assert len(batches) == 4  # 16 test examples, prepared locally in tmp_path on first use
  ref = sw.ShapesWorldSource(32, 16, seed=swt.SPLIT_SEEDS["test"])
  for i in (0, 5, 15):
    b, r = batches[i // 4], ref[i]
    np.testing.assert_allclose(b["image"][i % 4], r["image"] / 127.5 - 1.0, atol=1e-6)
    assert np.array_equal(b["tokens"][i % 4], fake_tokenize(r["caption"])[0])  # bytes decoded as UTF-8
  # Resized from the stored 32 px; default split is train (64 examples).
  c16 = cfg(source="tfds:shapes_world/tiny", tfds_data_dir=str(tmp_path), image_size=16)
  (b,) = take(ip.create_dataset(c16, batch_size=8, tokenize=fake_tokenize, seed=0), 1)
  assert b["image"].shape == (8, 16, 16, 3)
  with pytest.raises(ValueError, match="split 'validation' not in"):
    ip.check_input_and_source(cfg(source="tfds:shapes_world/tiny:validation", tfds_data_dir=str(tmp_path)))


def test_tfds_unprepared_dataset_is_not_downloaded(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match=r"config.input.source: TFDS dataset 'mnist' is not prepared.*never downloads"):
    ip.check_input_and_source(cfg(source="tfds:mnist:train", tfds_data_dir=str(tmp_path)))
  assert not any(tmp_path.iterdir())
  with pytest.raises(ValueError, match="config.input.source: TFDS dataset 'no_such_dataset_xyz' not found"):
    ip.check_input_and_source(cfg(source="tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))


def test_parse_source_forms(tmp_path):
  assert ip.parse_source("shapes_world") == ("shapes_world", None)
  assert ip.parse_source("tfds:mnist") == ("tfds", ("mnist", "train"))
  assert ip.parse_source("tfds:shapes_world/size32:test") == ("tfds", ("shapes_world/size32", "test"))
  assert ip.parse_source("tfds:mnist:3.0.1:train[:10%]") == ("tfds", ("mnist:3.0.1", "train[:10%]"))
  assert ip.parse_source("tfds:mnist:train[:10%]") == ("tfds", ("mnist", "train[:10%]"))
  assert ip.parse_source(f"folder:{tmp_path}") == ("folder", tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("source", "imagenet", r"config.input.source: must be one of .*folder:PATH"),
    ("source", "tfds:", r"config.input.source: must be one of"),
    ("source", "tfds:bad name!", r"config.input.source: must be .*TFDS dataset name"),
    ("source", "folder:/no/such/dir", r"config.input.source: must be 'folder:PATH' with an existing folder"),
    ("source", "jsonl:/no/such/file.jsonl", r"config.input.source: must be 'jsonl:PATH' with an existing"),
    ("image_size", 4, r"config.input.image_size: must be an integer >= 8, got 4"),
    ("num_examples", 0, r"config.input.num_examples: must be a positive integer"),
    ("data_seed", -1, r"config.input.data_seed"),
    ("worker_count", -1, r"config.input.worker_count: must be an integer >= 0"),
    ("prefetch_buffer_size", 0, r"config.input.prefetch_buffer_size"),
    ("caption_key", "", r"config.input.caption_key: must be a non-empty string"),
    ("shapes_world_tasks", ("colors", "colour"), r"config.input.shapes_world_tasks: must be a non-empty sequence"),
    ("shapes_world_tasks", (), r"config.input.shapes_world_tasks"),
    ("shapes_world_tasks", "colors", r"config.input.shapes_world_tasks"),
])
def test_validation_errors_name_the_field(field, value, match):
  c = ip.input_defaults().to_dict()
  c[field] = value
  with pytest.raises(ValueError, match=match):
    ip.check_input_and_source(c)  # a plain dict works too


def test_shapes_world_tasks_choose_the_captions():
  default = ip.make_source(cfg())
  assert {json.loads(default[i]["metadata"])["tag"] for i in range(64)} == set(ip.input_defaults().shapes_world_tasks)
  source = ip.make_source(cfg(shapes_world_tasks=("colors", "counting")))
  assert {json.loads(source[i]["metadata"])["tag"] for i in range(40)} == {"colors", "counting"}


def test_validation_unknown_key_and_empty_folder(tmp_path):
  c = ip.input_defaults()
  c.batch = 3  # ConfigDicts are open for new keys; the schema check is schema.validate_input's
  with pytest.raises(ValueError, match=r"config.input.batch: unknown key"):
    ip.check_input_and_source(c)
  with pytest.raises(ValueError, match=r"config.input.source: must be 'folder:PATH' with image files"):
    ip.check_input_and_source(cfg(source=f"folder:{tmp_path}"))
  write_images(tmp_path)  # images but no captions
  with pytest.raises(ValueError, match=r"config.input.source: image .* has no caption file"):
    ip.create_dataset(cfg(source=f"folder:{tmp_path}"), batch_size=2, tokenize=fake_tokenize, seed=0)


def test_global_batch_single_process():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  (local,) = take(ip.create_dataset(cfg(), batch_size=8, tokenize=fake_tokenize, seed=0), 1)
  for spec in (NamedSharding(mesh, P("data")), mesh):
    g = ip.global_batch(local, spec)
    assert g["image"].shape == (8, 32, 32, 3) and g["tokens"].shape == (8, L) and g["mask"].dtype == np.bool_
    for k in local:
      assert isinstance(g[k], jax.Array)
      assert g[k].sharding.is_equivalent_to(NamedSharding(mesh, P("data", *[None] * (local[k].ndim - 1))),
                                            local[k].ndim)
      assert len(g[k].addressable_shards) == 8 and g[k].addressable_shards[0].data.shape[0] == 1
      np.testing.assert_array_equal(np.asarray(g[k]), local[k])


def test_worker_processes_yield_the_same_batches():
  """``worker_count > 0`` (grain ``mp_prefetch``) changes where batches are made, not what they are."""
  ref = take(ip.create_dataset(cfg(), batch_size=4, tokenize=fake_tokenize, seed=1), 3)
  it = iter(ip.create_dataset(cfg(worker_count=1), batch_size=4, tokenize=fake_tokenize, seed=1))
  try:
    got = take(it, 3)
    json.dumps(it.get_state())
  finally:
    it.close()
  assert_batches_equal(got, ref)
