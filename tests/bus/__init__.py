"""Tests of the Dynamic Notes Bus (`pdt.bus`): visibility, versioning, teacher windows, counterfactuals."""
