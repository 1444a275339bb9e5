package main

import (
	"errors"
	"flag"
	"fmt"
	"time"
)

// cmdLoad sends closed-loop small GETs through one system for a while and prints the
// rate: steady load to profile a proxy under.
//
//	loadclient load -upstream ADDR -upstream-control ADDR -certs DIR -kind proxy|tunnel|direct -addr ADDR [-conns 64] [-duration 30s]
func cmdLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	upstream := fs.String("upstream", "", "upstream host:port")
	control := fs.String("upstream-control", "", "upstream stats host:port")
	certs := fs.String("certs", "", "directory of ca.pem, client.pem, client.key")
	kind := fs.String("kind", "proxy", "proxy (CONNECT and absolute-form), tunnel (L4) or direct")
	addr := fs.String("addr", "", "the proxy's address")
	conns := fs.Int("conns", 64, "keep-alive connections")
	duration := fs.Duration("duration", 30*time.Second, "how long")
	fs.Parse(args)
	if *upstream == "" || *control == "" || *certs == "" || (*addr == "" && *kind != "direct") {
		return errors.New("-upstream, -upstream-control, -certs and -addr are required")
	}
	cl, err := newClient(*upstream, *certs)
	if err != nil {
		return err
	}
	r := &runner{cl: cl, control: *control, errors: map[string]int{}}
	res, err := r.closedLoop(&system{name: *kind, kind: *kind, addr: *addr}, *conns, *duration)
	if err != nil {
		return err
	}
	fmt.Printf("%.0f req/s (%d requests, %d conns, %v)\n", res.rps, res.requests, *conns, *duration)
	return nil
}
