"""Bundled, ready-to-run services. prefork loads them by name and never imports them itself. Runs in: worker."""
