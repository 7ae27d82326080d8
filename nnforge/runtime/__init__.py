"""Edge runtimes: the arm runner (C++) and the wasm loaders (JavaScript) that bundles carry, and ``edge``, which
builds and runs them here under emulation."""
