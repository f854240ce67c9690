"""Training: optimizers (AdamW, Muon), the sharded state, the jitted step, metrics, and the loop.

    from ec_dit.training.loop import train, train_and_evaluate
"""
