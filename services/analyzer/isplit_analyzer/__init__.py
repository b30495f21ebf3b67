"""isplit analyzer: analysis jobs over HTTP; publishes split candidates to Kafka."""
