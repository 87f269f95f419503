"""Learning-rate schedules, each a ``torch.optim.lr_scheduler.LRScheduler``."""
