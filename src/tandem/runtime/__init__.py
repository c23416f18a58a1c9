"""Runtime planes: discovery, request plane and event plane."""
