"""A throwaway local Ray cluster for one test: prints its GCS address, lives until stdin
closes, then shuts down what it started (never `ray stop`, which would end other users'
clusters on the machine)."""

import sys

import ray

ctx = ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False,
               log_to_driver=False)   # a new cluster, whatever else runs here
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
