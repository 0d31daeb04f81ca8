"""One build = load → inspect → calibrate → allocate ranks → rewrite → validate → report."""
