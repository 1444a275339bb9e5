package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// A system under test. kind is "direct" (plain TCP to the upstream), "proxy" (mTLS to
// an HTTP proxy: CONNECT tunnels and absolute-form requests) or "tunnel" (mTLS to an L4
// tunnel whose far end is the upstream).
type system struct {
	name  string
	kind  string
	addr  string
	pid   int
	admin string // gateway admin base URL, for /metrics
}

type client struct {
	upstream string // host:port of the upstream, as proxies are asked for it
	tls      *tls.Config
	smallReq []byte // origin-form GET /small
	absReq   []byte // absolute-form GET http://upstream/small
	connect  []byte
}

func newClient(upstream, certDir string) (*client, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(certDir, "client.pem"), filepath.Join(certDir, "client.key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(certDir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no certificate", filepath.Join(certDir, "ca.pem"))
	}
	return &client{
		upstream: upstream,
		// No session cache: every connection is a full handshake, for every system.
		tls: &tls.Config{
			Certificates: []tls.Certificate{cert},
			RootCAs:      pool,
			ServerName:   "localhost",
			MinVersion:   tls.VersionTLS13,
		},
		smallReq: []byte("GET /small HTTP/1.1\r\nHost: " + upstream + "\r\nUser-Agent: loadclient\r\n\r\n"),
		absReq:   []byte("GET http://" + upstream + "/small HTTP/1.1\r\nHost: " + upstream + "\r\nUser-Agent: loadclient\r\n\r\n"),
		connect:  []byte("CONNECT " + upstream + " HTTP/1.1\r\nHost: " + upstream + "\r\n\r\n"),
	}, nil
}

// hconn is one HTTP/1.1 keep-alive connection and the request it repeats.
type hconn struct {
	c   net.Conn
	br  *bufio.Reader
	req []byte
}

func (cl *client) dial(s *system) (net.Conn, error) {
	if s.kind == "direct" {
		c, err := net.DialTimeout("tcp", cl.upstream, 10*time.Second)
		if err == nil {
			c.(*net.TCPConn).SetNoDelay(true)
		}
		return c, err
	}
	raw, err := net.DialTimeout("tcp", s.addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	raw.(*net.TCPConn).SetNoDelay(true)
	c := tls.Client(raw, cl.tls)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("%s: TLS handshake: %w", s.name, err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// tunnel opens a byte stream to the upstream: TCP, a CONNECT tunnel, or the L4 tunnel.
// Its requests are origin-form.
func (cl *client) tunnel(s *system) (*hconn, error) {
	c, err := cl.dial(s)
	if err != nil {
		return nil, err
	}
	h := &hconn{c: c, br: bufio.NewReaderSize(c, 32<<10), req: cl.smallReq}
	if s.kind == "proxy" {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(cl.connect); err != nil {
			c.Close()
			return nil, err
		}
		resp, err := http.ReadResponse(h.br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("%s: CONNECT: %w", s.name, err)
		}
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			c.Close()
			return nil, fmt.Errorf("%s: CONNECT answered %s: %s", s.name, resp.Status, strings.TrimSpace(string(b)))
		}
		c.SetDeadline(time.Time{})
	}
	return h, nil
}

// requester opens a keep-alive connection for small GETs: absolute-form through an
// HTTP proxy, origin-form straight or through an L4 tunnel.
func (cl *client) requester(s *system) (*hconn, error) {
	c, err := cl.dial(s)
	if err != nil {
		return nil, err
	}
	h := &hconn{c: c, br: bufio.NewReaderSize(c, 32<<10), req: cl.smallReq}
	if s.kind == "proxy" {
		h.req = cl.absReq
	}
	return h, nil
}

// get sends the connection's request and reads the whole answer, which must be 200.
func (h *hconn) get() error {
	if _, err := h.c.Write(h.req); err != nil {
		return err
	}
	return h.read()
}

func (h *hconn) read() error {
	resp, err := http.ReadResponse(h.br, nil)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %s", resp.Status)
	}
	if resp.Close {
		return fmt.Errorf("the proxy closes the connection after each request")
	}
	return nil
}

// bulk downloads n bytes on the connection; returns the seconds from the request to
// the last byte.
func (h *hconn) bulk(n int64) (float64, error) {
	req := "GET /bulk?bytes=" + strconv.FormatInt(n, 10) + " HTTP/1.1\r\nHost: bulk\r\n\r\n"
	start := time.Now()
	if _, err := h.c.Write([]byte(req)); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(h.br, nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("status %s", resp.Status)
	}
	buf := make([]byte, 256<<10)
	got, err := io.CopyBuffer(io.Discard, resp.Body, buf)
	if err != nil {
		return 0, err
	}
	if got != n {
		return 0, fmt.Errorf("got %d of %d bytes", got, n)
	}
	return time.Since(start).Seconds(), nil
}

// cpuSeconds is utime+stime of a process (all its threads), from /proc.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	// After the command: state(3) ... utime(14) stime(15), 1-based in proc(5).
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	// USER_HZ is 100 on every Linux ABI Go supports.
	return (u + st) / 100, nil
}

// rssKiB is the resident set size of a process.
func rssKiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				return strconv.ParseFloat(f[1], 64)
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// metric sums every sample of a Prometheus counter from a text exposition.
func metric(url, name string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	sum, found := 0.0, false
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || !(rest[0] == ' ' || rest[0] == '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
			found = true
		}
	}
	if !found {
		return 0, fmt.Errorf("%s: no %s", url, name)
	}
	return sum, nil
}

// upstreamConns is the number of connections the upstream has accepted.
func upstreamConns(control string) (float64, error) {
	resp, err := http.Get("http://" + control + "/conns")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
}
