from benchmarks.workloads import main

main()
