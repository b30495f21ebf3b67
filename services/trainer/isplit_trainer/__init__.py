"""isplit trainer: consumes split candidates, retrains head/tail pairs, exports and registers tails."""
