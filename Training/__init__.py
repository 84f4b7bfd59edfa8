"""Training pipelines of SAM-Med3D-MoE: pre-train, fine-tune an expert, train the gate, evaluate.

Each script runs as ``python -m Training.<name>`` from the repository root (or under
``torchrun``); see Training/README.md. Shared building blocks that inference also needs (click
simulation, the evaluation protocol, preprocessing) live in ``SAMMed3DMoELib``.
"""
