"""Differential privacy, one job per module, imports pointing down the list:

- accounting: DP-SGD (Poisson-subsampled Gaussian) events, epsilon, noise calibration;
- contributions: each user's contribution bound (at most k examples/pairs);
- els_accounting: ELS's user-level accountant (mixtures of Gaussians);
- ledger: the steps a run took, and the composition of several stages' steps;
- planning: the plan of a private run (units, rate, noise, default k, the plan table);
- clipping: per-unit gradients and clipping (packed segments, ghost norms);
- statement: what privacy.json says, end to end over the lineage;
- lineage: what a run was made from (inputs, models, stages, hashed users);
- dpsgd: the private step (sample, clip, noise, scale) a recipe runs;
- verify: every epsilon of a run recomputed with plain dp-accounting.
"""
