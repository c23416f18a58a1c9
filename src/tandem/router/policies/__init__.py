"""One module per routing policy (``tandem.router.registry`` maps ``--router`` names to them)."""
