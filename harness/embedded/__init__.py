"""What the project builds for itself: the embedded models and the generators of the shipped data in data/.
Part of the base layer, below harness.core (which resolves embedded model names): it imports only
harness.paths."""
