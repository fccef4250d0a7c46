"""DPO engine: batch layouts, log-probs, losses, reference cache, the Trainer subclass and `run_training`."""
