"""Cloud Run Job entry points: bulk re-embedding of the knowledge graph, sharded by task index."""
