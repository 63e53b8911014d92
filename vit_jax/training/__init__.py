"""Training: the step (step.py), the state (state.py), the run (loop.py), the optimizer
(optim.py), what is learned (objectives/), the config check, the workdir and its reports."""
