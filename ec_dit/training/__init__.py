"""Training: optimizers (AdamW, Muon), the sharded state, the jitted step, metrics, and the loop.

    from ec_dit.training.loop import train, train_and_evaluate   # the loop, with the jobs it is given
    from ec_dit.evaluators import train, train_and_evaluate      # as the CLI: sample grids, routing maps, GenEval
"""
