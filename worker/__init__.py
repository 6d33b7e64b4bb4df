"""gemma-batch worker: batched Gemma inference behind Pub/Sub, HTTP and bulk jobs."""
