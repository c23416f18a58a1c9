"""event_plane."""
