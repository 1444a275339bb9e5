package main

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

// cmdPorts prints N free loopback TCP ports, one a line.
func cmdPorts(args []string) error {
	fs := flag.NewFlagSet("ports", flag.ExitOnError)
	n := fs.Int("n", 1, "how many")
	fs.Parse(args)
	var ls []net.Listener
	for i := 0; i < *n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		ls = append(ls, l)
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return nil
}

// cmdUpstream serves GET /small (100 bytes) and GET /bulk?bytes=N on -listen, and on
// -control the number of connections -listen has accepted (GET /conns).
func cmdUpstream(args []string) error {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "data address")
	control := fs.String("control", "127.0.0.1:0", "stats address")
	fs.Parse(args)
	var conns atomic.Int64
	small := bytes.Repeat([]byte("x"), 100)
	chunk := make([]byte, 256<<10)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.Header().Set("Content-Type", "text/plain")
		w.Write(small)
	})
	mux.HandleFunc("/bulk", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bytes=N", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		w.Header().Set("Content-Type", "application/octet-stream")
		for n > 0 {
			k := min(n, int64(len(chunk)))
			if _, err := w.Write(chunk[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	srv := &http.Server{
		Handler: mux,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		},
		ErrorLog: nil,
	}
	ctl := http.NewServeMux()
	ctl.HandleFunc("/conns", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, conns.Load())
	})
	cl, err := net.Listen("tcp", *control)
	if err != nil {
		return err
	}
	go http.Serve(cl, ctl)
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	return srv.Serve(l)
}

// cmdOtlpSink answers 200 to every OTLP/HTTP protobuf POST /v1/traces and counts the
// spans (GET /stats: "requests spans").
func cmdOtlpSink(args []string) error {
	fs := flag.NewFlagSet("otlp-sink", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:4318", "address")
	fs.Parse(args)
	var requests, spans atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/traces", func(w http.ResponseWriter, r *http.Request) {
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			z, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = z
		}
		b, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		requests.Add(1)
		spans.Add(int64(countSpans(b)))
		// An empty ExportTraceServiceResponse.
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.WriteHeader(http.StatusOK)
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d %d\n", requests.Load(), spans.Load())
	})
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	return http.Serve(l, mux)
}

// countSpans walks ExportTraceServiceRequest{1: ResourceSpans{2: ScopeSpans{2: Span}}}.
func countSpans(b []byte) int {
	n := 0
	eachField(b, func(f int, v []byte) {
		if f == 1 {
			eachField(v, func(f int, v []byte) {
				if f == 2 {
					eachField(v, func(f int, _ []byte) {
						if f == 2 {
							n++
						}
					})
				}
			})
		}
	})
	return n
}

// eachField calls fn with every length-delimited field of a protobuf message.
func eachField(b []byte, fn func(field int, value []byte)) {
	for len(b) > 0 {
		key, k := binary.Uvarint(b)
		if k <= 0 {
			return
		}
		b = b[k:]
		switch key & 7 {
		case 0:
			_, k := binary.Uvarint(b)
			if k <= 0 {
				return
			}
			b = b[k:]
		case 1:
			if len(b) < 8 {
				return
			}
			b = b[8:]
		case 5:
			if len(b) < 4 {
				return
			}
			b = b[4:]
		case 2:
			l, k := binary.Uvarint(b)
			if k <= 0 || uint64(len(b)-k) < l {
				return
			}
			fn(int(key>>3), b[k:k+int(l)])
			b = b[k+int(l):]
		default:
			return
		}
	}
}

// cmdWorkloadAPI serves the SPIFFE Workload API's FetchX509SVID (gRPC over HTTP/2
// without TLS on a unix socket) with one fixed SVID; enough for a workload that only
// needs its X.509-SVID and bundle. It never rotates.
func cmdWorkloadAPI(args []string) error {
	fs := flag.NewFlagSet("workload-api", flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path")
	certF := fs.String("cert", "", "SVID certificate chain (PEM)")
	keyF := fs.String("key", "", "SVID key (PKCS#8 PEM)")
	bundleF := fs.String("bundle", "", "trust bundle (PEM)")
	id := fs.String("id", "spiffe://example.org/ns/egress-gateway/sa/egress-gateway", "SPIFFE ID of the SVID")
	fs.Parse(args)
	if *socket == "" || *certF == "" || *keyF == "" || *bundleF == "" {
		return errors.New("-socket, -cert, -key and -bundle are required")
	}
	chain, err := pemDER(*certF, "CERTIFICATE")
	if err != nil {
		return err
	}
	key, err := pemDER(*keyF, "PRIVATE KEY")
	if err != nil {
		return err
	}
	bundle, err := pemDER(*bundleF, "CERTIFICATE")
	if err != nil {
		return err
	}
	// X509SVID{1: spiffe_id, 2: x509_svid, 3: x509_svid_key, 4: bundle}
	var svid []byte
	svid = pbBytes(svid, 1, []byte(*id))
	svid = pbBytes(svid, 2, chain)
	svid = pbBytes(svid, 3, key)
	svid = pbBytes(svid, 4, bundle)
	// X509SVIDResponse{1: svids}
	msg := pbBytes(nil, 1, svid)
	frame := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:], uint32(len(msg)))
	frame = append(frame, msg...)

	mux := http.NewServeMux()
	mux.HandleFunc("/SpiffeWorkloadAPI/FetchX509SVID", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("workload.spiffe.io") != "true" {
			grpcStatus(w, 7, "security header missing from request")
			return
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		w.Write(frame)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		// A stream: the next update would follow; there is none.
		<-r.Context().Done()
		w.Header().Set("Grpc-Status", "0")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		grpcStatus(w, 12, "not served by this Workload API")
	})
	os.Remove(*socket)
	l, err := net.Listen("unix", *socket)
	if err != nil {
		return err
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: mux, Protocols: &p}
	return srv.Serve(l)
}

// grpcStatus writes a trailers-only gRPC answer.
func grpcStatus(w http.ResponseWriter, code int, message string) {
	w.Header().Set("Content-Type", "application/grpc")
	w.Header().Set("Grpc-Status", strconv.Itoa(code))
	w.Header().Set("Grpc-Message", message)
	w.WriteHeader(http.StatusOK)
}

func pbBytes(b []byte, field int, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(field)<<3|2)
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

// pemDER concatenates the DER of every block of type kind in a PEM file.
func pemDER(path, kind string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type == kind {
			out = append(out, blk.Bytes...)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no %s block", path, kind)
	}
	return out, nil
}

// cmdWait waits until a TCP address accepts or a URL answers 200.
func cmdWait(args []string) error {
	fs := flag.NewFlagSet("wait", flag.ExitOnError)
	tcp := fs.String("tcp", "", "address")
	u := fs.String("http", "", "URL")
	timeout := fs.Duration("timeout", 30*time.Second, "")
	fs.Parse(args)
	deadline := time.Now().Add(*timeout)
	for {
		var err error
		switch {
		case *tcp != "":
			var c net.Conn
			if c, err = net.DialTimeout("tcp", *tcp, time.Second); err == nil {
				c.Close()
				return nil
			}
		case *u != "":
			var resp *http.Response
			if resp, err = http.Get(*u); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return nil
				}
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		default:
			return errors.New("-tcp or -http is required")
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s%s not ready after %v: %v", *tcp, *u, *timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
