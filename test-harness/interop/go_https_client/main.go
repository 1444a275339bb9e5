// Command go_https_client POSTs an OpenAI-style chat completion to URL, N times (default
// 1), with one net/http client: keep-alive, and HTTP/2 when the server's ALPN offers it
// (ForceAttemptHTTP2). It is configured only by the environment:
//
//	HTTPS_PROXY/HTTP_PROXY/NO_PROXY  http.ProxyFromEnvironment (an https:// proxy too;
//	                                 never used for localhost/127.0.0.1 targets)
//	SSL_CERT_FILE                    the CA bundle for the origin (Go's default)
//	EGRESS_PROXY_CERT, EGRESS_PROXY_KEY
//	                                 a client certificate (PEM) for an https:// proxy that
//	                                 asks for one (e.g. an SVID for the gateway itself)
//	EGRESS_PROXY_CA                  the proxy's CA bundle (PEM); RootCAs then trusts it
//	                                 and SSL_CERT_FILE (or the system roots when unset),
//	                                 since Go verifies the proxy and the origin with the
//	                                 same TLSClientConfig
//	EGRESS_TEST_MODEL                the model in the body (default gpt-4o-mini)
//	OPENAI_API_KEY                   sent as "Authorization: Bearer ..." when set
//
// usage: go_https_client URL [N]
//
// Prints one JSON line per request: {"status": N, "proto": "HTTP/2.0"|"HTTP/1.1",
// "body": "...", "reused": bool}, or {"error": "..."} for a request that failed (then
// it stops). Exits 0 either way, 2 on bad usage or configuration; the test decides.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go_https_client URL [N]")
		os.Exit(2)
	}
	url, n := os.Args[1], 1
	if len(os.Args) > 2 {
		var err error
		if n, err = strconv.Atoi(os.Args[2]); err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "bad N %q\n", os.Args[2])
			os.Exit(2)
		}
	}
	tlsConfig, err := tlsConfigFromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.Proxy = http.ProxyFromEnvironment
	transport.ForceAttemptHTTP2 = true
	transport.TLSClientConfig = tlsConfig
	client := &http.Client{Transport: transport, Timeout: 20 * time.Second}

	model := os.Getenv("EGRESS_TEST_MODEL")
	if model == "" {
		model = "gpt-4o-mini"
	}
	body, _ := json.Marshal(map[string]any{
		"model":    model,
		"messages": []map[string]string{{"role": "user", "content": "Say hello."}},
	})
	out := json.NewEncoder(os.Stdout)
	for i := 0; i < n; i++ {
		line, err := post(client, url, body)
		if err != nil {
			_ = out.Encode(map[string]any{"error": err.Error()})
			return
		}
		_ = out.Encode(line)
	}
}

func post(client *http.Client, url string, body []byte) (map[string]any, error) {
	reused := false
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	req.Header.Set("Content-Type", "application/json")
	if key := os.Getenv("OPENAI_API_KEY"); key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	// Read to the end so that the connection goes back to the pool.
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return map[string]any{
		"status": resp.StatusCode,
		"proto":  resp.Proto,
		"body":   string(b),
		"reused": reused,
	}, nil
}

func tlsConfigFromEnv() (*tls.Config, error) {
	cfg := &tls.Config{}
	certFile, keyFile := os.Getenv("EGRESS_PROXY_CERT"), os.Getenv("EGRESS_PROXY_KEY")
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("set both EGRESS_PROXY_CERT and EGRESS_PROXY_KEY, or neither")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if proxyCA := os.Getenv("EGRESS_PROXY_CA"); proxyCA != "" {
		// Setting RootCAs replaces the default pool (which is what reads SSL_CERT_FILE),
		// so build it from both files.
		var pool *x509.CertPool
		if sslCertFile := os.Getenv("SSL_CERT_FILE"); sslCertFile != "" {
			pool = x509.NewCertPool()
			if err := appendPEM(pool, sslCertFile); err != nil {
				return nil, err
			}
		} else {
			var err error
			if pool, err = x509.SystemCertPool(); err != nil {
				return nil, fmt.Errorf("system roots: %w", err)
			}
		}
		if err := appendPEM(pool, proxyCA); err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

func appendPEM(pool *x509.CertPool, file string) error {
	pem, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("%s: no PEM certificates", file)
	}
	return nil
}
