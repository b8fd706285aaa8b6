"""Pure wire protocol: message codec, schemas and serialization. No sockets, no threads."""
