"""What the project builds for itself: the embedded models and the generators of the shipped data in data/.
Part of the base layer: it imports only harness.core."""
