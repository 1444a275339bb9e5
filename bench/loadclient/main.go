// Command loadclient is the load generator and the helpers of bench/compare.sh: test
// certificates, the upstream, an OTLP/HTTP sink, a SPIFFE Workload API serving fixed
// SVIDs, and the measurements themselves. Standard library only, so it builds offline,
// and independent of the gateway's own code.
//
//	loadclient certs -dir DIR
//	loadclient ports -n N
//	loadclient upstream -listen ADDR -control ADDR
//	loadclient otlp-sink -listen ADDR
//	loadclient workload-api -socket PATH -cert F -key F -bundle F
//	loadclient wait (-tcp ADDR | -http URL) [-timeout 30s]
//	loadclient run ... / loadclient report ... (see run.go)
//	loadclient load ... (see load.go)
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmds := map[string]func([]string) error{
		"certs":        cmdCerts,
		"ports":        cmdPorts,
		"upstream":     cmdUpstream,
		"otlp-sink":    cmdOtlpSink,
		"workload-api": cmdWorkloadAPI,
		"wait":         cmdWait,
		"run":          cmdRun,
		"load":         cmdLoad,
		"report":       cmdReport,
	}
	cmd, ok := cmds[os.Args[1]]
	if !ok {
		usage()
	}
	if err := cmd(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadclient %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loadclient certs|ports|upstream|otlp-sink|workload-api|wait|run|report|load [flags]")
	os.Exit(2)
}
