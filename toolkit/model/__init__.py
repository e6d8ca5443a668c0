"""Models and the data they learn from: the model zoo (naming, building and splitting
models, ``zoo.py``), checkpoints (``checkpoint.py``), centralized training and
evaluation (``train.py``), structured pruning with a replayable record (``pruning.py``),
every stage's MACs and output shape (``analysis.py``), the datasets (``datasets.py``)
and their non-IID partitions over devices (``partition.py``). The rest of the toolkit
builds on these.
"""
