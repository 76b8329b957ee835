timeout 420 python3 -m pytest -q -p no:cacheprovider --durations=8 tests/test_gpu_attention.py tests/test_gemv.py --deselect tests/test_gemv.py::test_gemv_equals_torch_under_the_interpreter
