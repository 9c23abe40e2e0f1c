"""What is built on the engine and the runtime but is no part of serving a job: the benchmark, the demo-model
writer and the engine's test rig. Tools may import engine and runtime; nothing in engine imports tools."""
