"""``engine: fastai``: fastai's own fit on Ray Train ranks (``engine``), fastai's data and
optimizer state made rank-aware (``data``), Learner <-> workload protocol (``learner``), and
drop-in callbacks for plain fastai scripts that need no Ray (``callbacks``)."""
