"""The demo task (city + date as strict JSON): its generator and rows."""
