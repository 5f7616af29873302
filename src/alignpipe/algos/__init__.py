"""Algorithms: the PHF objectives, PPO math, the DPO trainer config."""
