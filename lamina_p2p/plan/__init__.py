"""The planner: how fast, and at what price, a model decodes on given hardware, offloaded or not.

`geometry` reads a model's shape (a preset or a checkpoint's ModelConfig), `hardware`
the device catalog and assumptions, `profile` optional measured timings; `cost` turns
them into per-step times and `planner` into answers (one configuration against its
equal-cost baseline, or a sweep). `report` runs and prints `lamina-node plan` (its click command is in `lamina_p2p.cli.plan`). Nothing here loads
weights or runs a kernel.
"""
