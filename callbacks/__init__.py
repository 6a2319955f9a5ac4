"""Lightning callbacks only: thin wrappers over :mod:`measures`, one file each.

- :class:`callbacks.epoch_measurement.EpochEndMeasurement`: the base of a measurement taken at
  epoch ends (subclass it for a new measurement; docs/extending.md "Adding a callback");
- :class:`callbacks.hessian_spectrum.HessianSpectrum`: top of the Hessian spectrum;
- :class:`callbacks.adversarial_accuracy.AdversarialAccuracy`: clean and robust accuracy;
- :class:`callbacks.training_target.TrainingTarget`: stop at a target train loss/accuracy;
- :class:`callbacks.mid_epoch_checkpoint.MidEpochCheckpoint`: ``last.ckpt`` inside long epochs,
  every N optimizer steps or T minutes (off by default).
"""
