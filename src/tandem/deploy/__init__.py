"""Deployments: graphs of components, and starting them as local processes (`tandem serve`)."""
