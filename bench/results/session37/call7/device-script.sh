# session 37, call 7: the HTTP server (its tokenizing now off the event loop) against in-process, 32 req/s, one machine
HTTP_RATE=32 DURATION=30 WARMUP=5 DRAIN=10 timeout 340 bash bench/gpu_session.sh http
