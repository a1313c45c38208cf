"""The `rlhf-ray` command (`main.py`), its Ray Jobs API commands (`submit.py`)
and how it reports failures (`errors.py`). Thin: each command parses its
arguments, builds a config, and calls one function in `rlhf_ray.jobs`.

Ray is imported lazily, inside the cluster commands only (`submit.py` talks
to the Jobs API over HTTP with Ray's client), so `rlhf-ray --help`,
`presets` and `config` answer without loading Ray or torch.
"""
