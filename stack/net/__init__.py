"""Protocol engines: pure and deterministic. Time comes in as an argument."""
