"""The measurement library: pure torch, no Lightning, Hydra or W&B.

- :mod:`measures.operators`: the symmetric linear operator the solvers see
  (:class:`~measures.operators.LinearOperator`, a plain matrix as one) and the Lanczos process;
- :mod:`measures.linalg`: extreme eigenvalues by Lanczos (:func:`~measures.linalg.lanczos_eigenvalues`),
  with its stop, warm start and progress;
- :mod:`measures.estimators`: power iteration, Hutchinson trace and spectral density (SLQ);
- :mod:`measures.hessian`: the exact Hessian of a model's loss as such an operator, and the
  one-call :func:`~measures.hessian.hessian_eigenvalues`, :func:`~measures.hessian.hessian_trace`,
  :func:`~measures.hessian.hessian_density`;
- :mod:`measures.attacks`: the attack specs (:class:`~measures.attacks.AttackSpec`), adversarial
  examples for training, and exact robust-accuracy counts over an eps grid, nested by default
  (:func:`~measures.attacks.robust_accuracy_counts`, per sample :func:`~measures.attacks.robust_masks`);
- :mod:`measures.pgd`: FGSM and PGD (L∞, L2), their step, projection and random starts;
- :mod:`measures.apgd`: AutoAttack's APGD-CE and targeted APGD-DLR (Croce & Hein 2020), counted by
  the same function (``AttackSpec("apgdce" | "apgdt", ...)``); one APGD run on a batch of rows in
  :mod:`measures.apgd_run`;
- :mod:`measures.names`: the attacks' and norms' names (torch-free: the run config reads them);
- :mod:`measures.checks`: gradient-masking checks on those counts;
- :mod:`measures.distributed`, :mod:`measures.batches`, :mod:`measures.module_state`,
  :mod:`measures.noise`: the process group as an argument, the fixed samples a measurement runs on,
  leaving a model as found, and the attacks' random numbers (per sample, or from a generator).

Every function works on a plain ``nn.Module`` and tensors; collectives run only over the process
group a caller passes (by default the initialized default group, if any).
"""
