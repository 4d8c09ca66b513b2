"""Ming Omni Studio inference engine: config, checkpoint loading, the Ming-flash-omni model and generation."""
