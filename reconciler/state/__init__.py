"""The state database: schema, engines, durable writes, lock, history, retention."""
