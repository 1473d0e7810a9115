"""The upload side: a durable queue in the journal, workers that put and verify objects."""
