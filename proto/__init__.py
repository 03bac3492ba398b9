"""The wire contract: versioned gRPC services (ingest/v1) and the Arrow schemas (schema)."""
