module egressbench/loadclient

go 1.24
