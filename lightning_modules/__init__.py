"""LightningModules and LightningDataModules: the models, their SGD hyperparameters, the data."""
