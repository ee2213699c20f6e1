"""LightningModules: PPD (adversarial DQN) and the baselines."""
