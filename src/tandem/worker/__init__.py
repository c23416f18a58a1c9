"""A worker: one engine served on the request plane and registered in discovery."""
