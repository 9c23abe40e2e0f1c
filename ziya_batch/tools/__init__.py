"""What is built on the engine and work/ but is no part of serving a job: the benchmark, the demo-model
writer and the engine's test rig. Tools may import engine and work; nothing in engine imports tools."""
