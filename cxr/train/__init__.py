"""Training loops for Ray Train (plain functions of their config) and checkpoint helpers."""
