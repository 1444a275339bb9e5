// Command goclient fetches one URL with Go's net/http default transport, configured
// only by the standard proxy environment variables (HTTP_PROXY/HTTPS_PROXY, lower-case
// too) and SSL_CERT_FILE for the CA bundle.
//
// usage: goclient URL [HEADER=VALUE...]
//
// Prints one JSON object: {"status": N, "body": "..."} when a response arrived, or
// {"error": "..."} when the client failed (e.g. a refused CONNECT). Exits 0 either way.
package main

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	out := map[string]any{}
	req, err := http.NewRequest(http.MethodGet, os.Args[1], nil)
	if err == nil {
		for _, h := range os.Args[2:] {
			if k, v, ok := strings.Cut(h, "="); ok {
				req.Header.Set(k, v)
			}
		}
		client := &http.Client{Timeout: 20 * time.Second}
		var resp *http.Response
		resp, err = client.Do(req)
		if err == nil {
			defer resp.Body.Close()
			var body []byte
			body, err = io.ReadAll(resp.Body)
			out["status"] = resp.StatusCode
			out["body"] = string(body)
		}
	}
	if err != nil {
		out = map[string]any{"error": err.Error()}
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}
