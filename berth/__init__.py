"""Code shared by berth's controller, agent and CLI: the generated API (berth.api), the one place where
gRPC servers and channels are made (berth.rpc), and parsing of sizes and CPU counts (berth.units)."""
